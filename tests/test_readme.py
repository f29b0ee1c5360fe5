"""Every command in README.md runs, with tiny stand-ins of the same model classes.

Hub ids become tiny local checkpoints, `s3://` becomes a `file://` URL, 8-GPU launches become
2-process CPU launches and batch sizes shrink; everything else is the README's text verbatim.
`kd-demo` is run (in its quick form) by tests/test_demo.py, and the test command by CI itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kd_cache.families import FAMILIES as REGISTRY
from kd_demo import tiny
from tests.vlm_families import FAMILIES, other_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def readme_commands() -> list[str]:
    cmds = []
    for block in readme_blocks("bash"):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def test_readme_lists_the_set_up_and_the_two_commands():
    cmds = readme_commands()
    assert cmds[:3] == ['pip install -e ".[dev]"', "kd-demo --out demo-out", "python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    # CI runs the README's one install command in its own venv, then the README's test command.
    assert "python3 -m venv" in ci and 'pip install --quiet -e ".[dev]"' in ci
    assert "python -m pytest -q" in ci


def test_readme_family_table_lists_the_registry():
    """README's "Supported model families" table has one row per family of ``kd_cache.families``, in its order."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Supported model families", 1)[1].split("\n\n| ", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| .*?\(`(\w+)`\) \|", table, flags=re.M)
    assert rows == list(REGISTRY)


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, processor, teacher_dir):
    work = tmp_path / "work"
    work.mkdir()
    llm = tiny.build_causal_lm(tmp_path / "llm", tokenizer=processor.tokenizer)
    qwen = FAMILIES["qwen2_5_vl"]  # the Supported model families example, tiny and same-family
    qwen_teacher, qwen_student = qwen.build(tmp_path / "qwen-t"), qwen.build(tmp_path / "qwen-s", student=True)
    # "Teacher and student of different families": students with another tokenizer than the teachers'
    internvl_teacher = FAMILIES["internvl"].build(tmp_path / "internvl-t")
    with other_tokenizer():
        smol_student = FAMILIES["smolvlm"].build(tmp_path / "smol-s", student=True)
        ov_student = FAMILIES["llava_onevision"].build(tmp_path / "ov-s", student=True)
    cap, cap_images = tiny.make_llava_dataset(tmp_path / "cap", n=8, seed=3, caption=True)
    ift, ift_images = tiny.make_llava_dataset(tmp_path / "ift", n=8, seed=4)
    shutil.copy(cap, work / "blip_laion_cc_sbu_558k.json")
    shutil.copy(ift, work / "llava_v1_5_mix665k.json")
    (work / "data").mkdir()
    (work / "data" / "pretrain").symlink_to(cap_images)
    (work / "data" / "finetune").symlink_to(ift_images)
    bucket = tmp_path / "bucket"
    (bucket / "caches").mkdir(parents=True)
    (work / "caches").symlink_to(bucket / "caches")

    bindir = Path(sys.executable).parent
    launch = (f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_machines 1 "
              "--mixed_precision no --dynamo_backend no --main_process_port {port} --num_processes 2")
    subs = [
        (r"accelerate launch --num_processes \d+", None),
        (r"llava-hf/llava-interleave-qwen-7b-hf", str(teacher_dir)),
        (r"google/siglip-so400m-patch14-384", str(teacher_dir)),
        (r"Qwen/Qwen1\.5-0\.5B", str(llm)),
        (r"Qwen/Qwen2\.5-VL-7B-Instruct", str(qwen_teacher)),
        (r"Qwen/Qwen2\.5-VL-3B-Instruct", str(qwen_student)),
        (r"--out caches/qwen-ift", "--max-length 1024 --out caches/qwen-ift"),  # the tiny student's positions
        (r"HuggingFaceTB/SmolVLM-256M-Instruct", str(smol_student)),
        (r"OpenGVLab/InternVL3-8B-hf", str(internvl_teacher)),
        (r"llava-hf/llava-onevision-qwen2-0\.5b-ov-hf", str(ov_student)),
        (r"--out caches/internvl-ift", "--max-length 1024 --out caches/internvl-ift"),
        (r"s3://my-bucket/", bucket.as_uri() + "/"),
        (r"--batch-size \d+", "--batch-size 2"),
        (r"--grad-accum \d+", "--grad-accum 1"),
        (r"--num-workers \d+", "--num-workers 0"),
        (r"--save-every \d+", "--save-every 1"),
    ]
    skip = ("pip install", "kd-demo", "python -m pytest")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    ran = 0
    for i, cmd in enumerate(readme_commands()):
        if cmd.startswith(skip):
            continue
        for pattern, repl in subs:
            cmd = re.sub(pattern, launch.format(port=29600 + i) if repl is None else repl, cmd)
        res = subprocess.run(cmd, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        ran += 1
    assert ran >= 9
    assert (work / "runs" / "dft" / "model.safetensors").is_file()
    # The README's Python snippet loads the result with plain transformers.
    for block in readme_blocks("python"):
        subprocess.run([sys.executable, "-c", block], cwd=work, env=env, check=True, timeout=300)
