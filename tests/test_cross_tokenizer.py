"""Cross-vocabulary response distillation (``student.cross_tokenizer``): alignment and projection on two
hand-built tokenizers whose answers are known by construction, and the loss against a float64 reference
written from its definition on dense distributions."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from student.cross_tokenizer import (
    Alignment,
    VocabProjection,
    align_spans,
    build_projection,
    byte_spans,
    cached_projection,
    cross_vocab_divergence,
    project_teacher,
    projection_key,
    token_bytes,
)
from student.losses import SparseTeacher, sparse_divergence
from tests.loss_reference import ref_div

TEXT = "hello world 2024 é cat 😀"


def _bpe(base: list[str], words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary and merges that build each word from its prefixes, left to right."""
    vocab = {c: i for i, c in enumerate(base)}
    merges = []
    for w in words:
        for n in range(2, len(w) + 1):
            if w[:n] not in vocab:
                merges.append((w[: n - 1], w[n - 1]))
                vocab[w[:n]] = len(vocab)
    return vocab, merges


@pytest.fixture(scope="module")
def teacher_tok():
    """Byte-level BPE (GPT-2 style ``Ġ``): no merge for the emoji, one for ``é`` and the digit run."""
    vocab, merges = _bpe(["<|eot|>"] + sorted(pre_tokenizers.ByteLevel.alphabet()),
                         ["hel", "lo", "Ġworld", "Ġcat", "Ã©", "2024"])
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot|>")


@pytest.fixture(scope="module")
def student_tok():
    """SentencePiece style (``▁``, byte fallback ``<0xNN>``, Llama's decoder), no ``é`` and no emoji."""
    base = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list("▁helowrdcat0124A")
    vocab, merges = _bpe(base, ["▁hello", "▁wor", "ld", "▁cat", "20", "24"])
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _encode(tok, text):
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = enc["input_ids"]
    lens = [None if b is None else len(b) for b in (token_bytes(tok)[i] for i in ids)]
    return ids, tok.convert_ids_to_tokens(ids), byte_spans(text, enc["offset_mapping"], lens)


def test_alignment_known_by_construction(teacher_tok, student_tok):
    t_ids, t_pieces, t_spans = _encode(teacher_tok, TEXT)
    s_ids, s_pieces, s_spans = _encode(student_tok, TEXT)
    assert t_pieces == ["hel", "lo", "Ġworld", "Ġ", "2024", "Ġ", "Ã©", "Ġcat", "Ġ", "ð", "Ł", "ĺ", "Ģ"]
    assert s_pieces == ["▁hello", "▁wor", "ld", "▁", "20", "24", "▁", "<0xC3>", "<0xA9>", "▁cat", "▁",
                        "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    # The emoji's four byte pieces share one character span: byte_spans gives each its byte.
    assert t_spans[-4:] == s_spans[-4:] == [(24, 25), (25, 26), (26, 27), (27, 28)]
    al = align_spans(t_spans, s_spans)
    pairs = [(t_pieces[a:b], s_pieces[c:d]) for (a, b), (c, d) in zip(al.teacher_groups, al.student_groups)]
    assert pairs == [
        (["hel", "lo"], ["▁hello"]),  # two teacher tokens merged into one student token
        (["Ġworld"], ["▁wor", "ld"]),  # one teacher token split in two
        (["Ġ"], ["▁"]),  # a lone space, 1:1
        (["2024"], ["20", "24"]),  # a digit run
        (["Ġ"], ["▁"]),
        (["Ã©"], ["<0xC3>", "<0xA9>"]),  # a character the student spells in byte-fallback tokens
        (["Ġcat"], ["▁cat"]),  # a leading space, 1:1
        (["Ġ"], ["▁"]),
        (["ð"], ["<0xF0>"]), (["Ł"], ["<0x9F>"]), (["ĺ"], ["<0x98>"]), (["Ģ"], ["<0x80>"]),  # emoji bytes 1:1
    ]
    assert al.orphan_teacher == al.orphan_student == []
    assert al.aligned_share == pytest.approx(8 / 15)
    assert al.one_to_one == [False, False, True, False, True, False, True, True, True, True, True, True]


def test_alignment_edge_cases():
    # Trimmed leading whitespace on one side: only ends count, so both tokens cover " cat".
    al = align_spans(byte_spans(" cat", [(1, 4)]), byte_spans(" cat", [(0, 4)]))
    assert al.teacher_groups == [(0, 1)] and al.one_to_one == [True]
    # Pieces sharing one character with no byte lengths stay one unit: a chunk, never a false 1:1 pair.
    al = align_spans(byte_spans("é", [(0, 1), (0, 1)]), byte_spans("é", [(0, 1)]))
    assert al.teacher_groups == [(0, 2)] and al.student_groups == [(0, 1)]
    # A special token covering no characters ((0, 0) offsets) sits at the end of the token before it:
    # with both sides ending with one it is 1:1; on the student side only it is an orphan, counted.
    al = align_spans(byte_spans("ab", [(0, 2), (0, 0)]), byte_spans("ab", [(0, 1), (1, 2), (0, 0)]))
    assert al.student_groups == [(0, 2), (2, 3)] and al.one_to_one == [False, True]
    al = align_spans(byte_spans("ab", [(0, 2)]), byte_spans("ab", [(0, 2), (0, 0)]))
    assert al.orphan_student == [1] and al.aligned_share == pytest.approx(1 / 2)
    assert align_spans([], []).aligned_share == 1.0


# The pure-Python alignment the vectorised one replaced, kept as the reference it is tested against.
def _ref_byte_spans(text, offsets, piece_bytes=None):
    cum = np.concatenate([[0], np.cumsum([len(c.encode()) for c in text])]).astype(int)
    out = []
    i, n = 0, len(offsets)
    prev_end = 0
    while i < n:
        s, e = offsets[i]
        if e <= s:  # covers no characters
            out.append((prev_end, prev_end))
            i += 1
            continue
        j = i + 1
        while j < n and tuple(offsets[j]) == (s, e):
            j += 1
        b0, b1 = int(cum[s]), int(cum[e])
        lens = None if piece_bytes is None else piece_bytes[i:j]
        if j - i > 1 and lens is not None and None not in lens and sum(lens) == b1 - b0:
            at = b0
            for n_bytes in lens:
                out.append((at, at + n_bytes))
                at += n_bytes
        else:
            out.extend([(b0, b1)] * (j - i))
        prev_end = b1
        i = j
    return out


def _ref_cuts(spans):
    return [(i + 1, e) for i, (_, e) in enumerate(spans) if i + 1 == len(spans) or spans[i + 1][0] >= e]


def _ref_align_spans(teacher_spans, student_spans):
    tc, sc = _ref_cuts(teacher_spans), _ref_cuts(student_spans)
    tg, sg = [], []
    i = j = 0
    t0 = s0 = 0
    while i < len(tc) and j < len(sc):
        (ti, tpos), (sj, spos) = tc[i], sc[j]
        if tpos < spos:
            i += 1
        elif tpos > spos:
            j += 1
        else:
            tg.append((t0, ti))
            sg.append((s0, sj))
            t0, s0 = ti, sj
            i += 1
            j += 1
    return Alignment(tg, sg, list(range(t0, len(teacher_spans))), list(range(s0, len(student_spans))))


_CHARS = "ab c  xyz09é中😀∑ñÿ\u0301🎉\U0010ffff"  # 1 to 4 bytes, continuation bytes 0x80 to 0xBF


def _random_tokens(rng: random.Random, text: str) -> tuple[list[tuple[int, int]], list[int | None] | None]:
    """A random tokenisation of ``text``: a tiling (leading spaces sometimes trimmed), multi-byte characters
    sometimes spelt in pieces sharing the character's span (lengths adding up to its bytes or not), whole
    spans repeated, empty spans ((-1, -1), (0, 0), (k, k)) anywhere; now and then arbitrary offsets
    (overlapping, backwards). Piece byte lengths: true, random, None, or no list at all."""
    offsets, lens = [], []

    def empty():
        k = rng.randint(0, len(text))
        offsets.append(rng.choice([(-1, -1), (0, 0), (k, k), (k, max(k - 1, 0))]))
        lens.append(rng.choice([None, 0, 1]))

    if rng.random() < 0.1:
        for _ in range(rng.randint(0, 12)):
            s = rng.randint(0, len(text))
            offsets.append((s, rng.randint(0, len(text))))
            lens.append(rng.choice([None, 0, 1, 2, 3, 4]))
    else:
        i = 0
        while i < len(text):
            if rng.random() < 0.15:
                empty()
            j = min(len(text), i + rng.choice([1, 1, 1, 2, 3, 5]))
            nbytes = len(text[i:j].encode())
            if rng.random() < 0.5 and (j - i == 1 and nbytes > 1 or rng.random() < 0.15):
                k = rng.choice([nbytes, nbytes, 2, 3])  # pieces sharing one span
                parts = sorted(rng.sample(range(1, nbytes), min(k, nbytes) - 1)) if nbytes > 1 else []
                good = [b - a for a, b in zip([0] + parts, parts + [nbytes])]
                good += [0] * (k - len(good))  # more pieces than bytes: zero-length ones
                if rng.random() < 0.2:
                    rng.shuffle(good)
                pick = rng.random()
                piece = (good if pick < 0.6 else [None if rng.random() < 0.5 else x for x in good] if pick < 0.8
                         else [rng.randint(0, 4) for _ in good])
                offsets += [(i, j)] * k
                lens += piece
            else:
                s = i + 1 if text[i] == " " and j - i > 1 and rng.random() < 0.5 else i
                offsets.append((s, j))
                lens.append(nbytes if rng.random() < 0.9 else rng.choice([None, nbytes + 1]))
            i = j
        while rng.random() < 0.2:
            empty()
    return offsets, (None if rng.random() < 0.2 else lens)


def test_vectorised_alignment_matches_reference():
    rng = random.Random(20240611)
    for case in range(3000):
        text = "".join(rng.choice(_CHARS) for _ in range(rng.choice([0, 1, 3, 8, 20, 40])))
        sides = []
        for _ in range(2):
            offsets, lens = _random_tokens(rng, text)
            got = byte_spans(text, offsets, lens)
            want = _ref_byte_spans(text, offsets, lens)
            assert got == want, (case, text, offsets, lens)
            assert all(type(a) is int and type(b) is int for a, b in got)
            assert byte_spans(text, np.asarray(offsets, dtype=np.int64).reshape(-1, 2), lens) == want
            sides.append(got)
        assert align_spans(*sides) == _ref_align_spans(*sides), (case, text, sides)
        # The walk on arbitrary spans (backwards, overlapping): the same groups and orphans.
        raw = [[(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(rng.randint(0, 8))] for _ in range(2)]
        assert align_spans(*raw) == _ref_align_spans(*raw), (case, raw)
        arrays = [np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in sides]
        assert align_spans(*arrays) == _ref_align_spans(*sides)


def test_byte_spans_refuses_lengths_of_another_tokenisation():
    with pytest.raises(ValueError, match="one length"):
        byte_spans("ab", [(0, 1), (1, 2)], [1])


def test_projection_known_by_construction(teacher_tok, student_tok, tmp_path):
    proj = build_projection(teacher_tok, student_tok)
    t, s = teacher_tok.convert_tokens_to_ids, student_tok.convert_tokens_to_ids

    def to(piece):
        return int(proj.to_student[t(piece)])

    assert to("Ġcat") == s("▁cat")  # Ġ and ▁ both stand for a space
    assert to("Ġ") == s("▁")
    assert to("ð") == s("<0xF0>") and to("Ģ") == s("<0x80>")  # byte-level piece <-> byte fallback
    assert to("A") == s("A")  # the student's "A" wins over its "<0x41>"
    assert to("2024") == to("Ġworld") == to("Ã©") == -1  # no student token with those bytes
    assert to("hel") == -1 and to("lo") == -1
    assert to("<|eot|>") == -1  # special tokens excluded ...
    paired = build_projection(teacher_tok, student_tok, pairs={t("<|eot|>"): s("</s>")})
    assert int(paired.to_student[t("<|eot|>")]) == s("</s>")  # ... unless paired explicitly
    assert proj.coverage == pytest.approx(float((proj.to_student >= 0).double().mean()))
    # Cached once per pair under a deterministic key; the same tokenizers give the same key.
    key = projection_key(teacher_tok, student_tok)
    assert key == projection_key(teacher_tok, student_tok) != projection_key(student_tok, teacher_tok)
    first = cached_projection(teacher_tok, student_tok, str(tmp_path))
    assert (tmp_path / f"{key}.npz").exists()
    again = cached_projection(teacher_tok, student_tok, str(tmp_path))
    assert torch.equal(first.to_student, again.to_student) and again.key == key
    # explicit pairs are part of the key: a cached projection without them is not reused
    with_pair = cached_projection(teacher_tok, student_tok, str(tmp_path), {t("<|eot|>"): s("</s>")})
    assert with_pair.key != key and int(with_pair.to_student[t("<|eot|>")]) == s("</s>")
    (tmp_path / f"{with_pair.key}.npz").write_bytes(b"damaged")  # rebuilt, not raised
    assert torch.equal(cached_projection(teacher_tok, student_tok, str(tmp_path), {t("<|eot|>"): s("</s>")}).to_student,
                       with_pair.to_student)
    with pytest.raises(ValueError, match="projection built for tokenizer pair"):
        VocabProjection.load(str(tmp_path / f"{key}.npz"), key="other")


def test_projected_distribution(teacher_tok, student_tok):
    """Top-3 {Ġcat: .5, Ġworld: .2, 2024: .1}, tail .2 -> on the student: {▁cat: .5}, else .5."""
    proj = build_projection(teacher_tok, student_tok)
    t = teacher_tok.convert_tokens_to_ids
    rows = SparseTeacher(torch.tensor([[t("Ġcat"), t("Ġworld"), t("2024")]]),
                         torch.tensor([[0.5, 0.2, 0.1]]).log(), torch.tensor([0.2]).log())
    out, unmapped = project_teacher(rows, proj, len(student_tok), torch.float64)
    kept = out.ids[0] >= 0
    assert out.ids[0][kept].tolist() == [student_tok.convert_tokens_to_ids("▁cat")]
    assert out.logprobs[0][kept].exp().tolist() == pytest.approx([0.5])
    assert float(out.tail.exp()) == pytest.approx(0.5)
    assert unmapped.tolist() == [[False, True, True]]
    # Two teacher ids with the same bytes ("A" and a byte-level alias via the pairs) share one bin.
    a = student_tok.convert_tokens_to_ids("A")
    proj2 = VocabProjection(torch.tensor([a, a, -1]), torch.zeros(len(student_tok), dtype=torch.bool), "x")
    out, _ = project_teacher(SparseTeacher(torch.tensor([[0, 1, 2]]), torch.tensor([[0.3, 0.2, 0.1]]).log(),
                                           torch.tensor([0.4]).log()), proj2, len(student_tok), torch.float64)
    assert out.ids[0][out.ids[0] >= 0].tolist() == [a]
    assert out.logprobs[0][out.ids[0] >= 0].exp().tolist() == pytest.approx([0.5])
    assert float(out.tail.exp()) == pytest.approx(0.5)


def test_same_tokenizer_is_todays_loss():
    """Identity projection, every position 1:1: the cross path gives ``sparse_divergence`` exactly."""
    g = torch.Generator().manual_seed(0)
    P, V, K = 7, 40, 6
    logits_t = torch.randn(P, V, generator=g) * 3
    logits_s = torch.randn(P, V, generator=g) * 3
    lp = logits_t.log_softmax(-1)
    top = lp.topk(K, -1)
    ids, tlp = top.indices, top.values
    ids[2, 4:] = -1  # a padded row
    ids[5] = -1  # an empty row
    tail = torch.log1p(-torch.where(ids >= 0, tlp.exp(), 0.0).sum(-1).clamp_max(1 - 1e-7))
    teacher = SparseTeacher(ids, tlp, tail)
    targets = torch.randint(0, V, (P,), generator=g)
    groups = align_spans([(i, i + 1) for i in range(P)], [(i, i + 1) for i in range(P)]).tensors()
    for div in ("fkl", "rkl", "jsd", "tvd"):
        from student.losses import DivergenceOptions

        out = cross_vocab_divergence(logits_s, targets, teacher, lp[torch.arange(P), targets], groups,
                                     VocabProjection.identity(V), options=DivergenceOptions(divergence=div))
        today = sparse_divergence(logits_s, ids, tlp, tail, divergence=div)
        torch.testing.assert_close(out.loss, today, rtol=1e-5, atol=1e-6)
        assert torch.equal(out.uld, torch.zeros(P))


def _reference(p_t, p_s, top_k, realised_t, realised_s, t_groups, s_groups, to_student, matched_w):
    """The loss from its definition in float64, one group at a time, with plain Python sets."""
    out = []
    image = {j for j in to_student if j >= 0}
    for (t0, t1), (s0, s1) in zip(t_groups, s_groups):
        scale_t = float(torch.prod(realised_t[t0 + 1:t1].exp()))
        scale_s = torch.prod(realised_s[s0 + 1:s1].exp())
        p, q = p_t[t0], p_s[s0]
        stored = p.topk(top_k).indices.tolist()
        bins = sorted({to_student[i] for i in stored if to_student[i] >= 0})
        P = torch.stack([sum(p[i] for i in stored if to_student[i] == j) * scale_t for j in bins] or [p[:0].sum()])
        Q = torch.stack([q[j] * scale_s for j in bins] or [q[:0].sum()])
        P = torch.cat([P[: len(bins)], (1 - P[: len(bins)].sum())[None]])
        Q = torch.cat([Q[: len(bins)], (1 - Q[: len(bins)].sum())[None]])
        kl = ref_div(P, Q, "fkl")
        t_un = sorted((float(p[i]) * scale_t for i in stored if to_student[i] < 0), reverse=True)
        s_free = torch.stack([q[j] * scale_s for j in range(len(q)) if j not in image])
        s_top = s_free.sort(descending=True).values[: len(t_un)]
        uld = sum((torch.tensor(a, dtype=torch.float64) - b).abs() for a, b in zip(t_un, s_top))
        out.append(matched_w * kl + (1 - matched_w) * uld)
    return torch.stack(out)


def test_loss_matches_float64_reference():
    """Tiny vocabularies (teacher 9, student 8), a 1:1 position, a merge chunk, a split chunk, and
    many-to-one and unmapped teacher ids; gradients flow to the student logits."""
    g = torch.Generator().manual_seed(3)
    V_t, V_s, K = 9, 8, 5
    to_student = [0, 1, 1, 2, 3, -1, -1, 6, -1]  # ids 1, 2 share student id 1; 5, 6, 8 unmapped
    proj = VocabProjection(torch.tensor(to_student), torch.tensor([j in to_student for j in range(V_s)]), "t")
    p_t = (torch.randn(4, V_t, generator=g, dtype=torch.float64) * 2).softmax(-1)
    logits_s = (torch.randn(4, V_s, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t_groups, s_groups = [(0, 1), (1, 3), (3, 4)], [(0, 1), (1, 2), (2, 4)]  # 1:1, 2 -> 1, 1 -> 2
    t_targets = torch.tensor([2, 7, 0, 4])
    s_targets = torch.tensor([1, 6, 0, 3])
    realised_t = p_t.log()[torch.arange(4), t_targets]
    top = p_t.log().topk(K, -1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    teacher = SparseTeacher(top.indices, top.values, tail)
    stored = [[to_student[i] for i in row] for row in top.indices[[0, 1, 3]].tolist()]
    assert all(-1 in row for row in stored) and any(row.count(1) == 2 for row in stored)  # unmapped, merged
    groups = {"t_first": torch.tensor([0, 1, 3]), "t_len": torch.tensor([1, 2, 1]),
              "s_first": torch.tensor([0, 1, 2]), "s_len": torch.tensor([1, 1, 2])}
    for w in (None, 0.5):
        out = cross_vocab_divergence(logits_s, s_targets, teacher, realised_t, groups, proj, matched_weight=w)
        realised_s = logits_s.log_softmax(-1)[torch.arange(4), s_targets]
        ref = _reference(p_t, logits_s.softmax(-1), K, realised_t, realised_s, t_groups, s_groups, to_student,
                         proj.coverage if w is None else w)
        torch.testing.assert_close(out.loss, ref, rtol=1e-9, atol=1e-12)
        assert out.one_to_one.tolist() == [True, False, False] and out.student_positions.tolist() == [1, 1, 2]
        assert (out.uld > 0).all() and (out.matched > 0).all()  # both parts are exercised in every group
        (g_out,) = torch.autograd.grad(out.loss.sum(), logits_s)
        (g_ref,) = torch.autograd.grad(ref.sum(), logits_s)
        torch.testing.assert_close(g_out, g_ref, rtol=1e-7, atol=1e-10)


def test_chunked_from_hidden_states_equals_the_whole():
    """``chunked_cross_divergence``: CE over every student row (an orphan row after the last group
    included) and the groups' loss from hidden states and the head, chunk by chunk (groups never cut,
    logits recomputed in backward or kept), equal the whole-matrix computation, gradients included."""
    from student.cross_tokenizer import chunked_cross_divergence

    g = torch.Generator().manual_seed(5)
    V_t, V_s, K, d, P_t, P_s = 9, 8, 5, 6, 6, 7
    to_student = [0, 1, 1, 2, 3, -1, -1, 6, -1]
    proj = VocabProjection(torch.tensor(to_student), torch.tensor([j in to_student for j in range(V_s)]), "t")
    lp_t = (torch.randn(P_t, V_t, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    top = lp_t.topk(K, -1)
    teacher = SparseTeacher(top.indices, top.values, torch.log1p(-top.values.exp().sum(-1)))
    realised_t = lp_t[:, 0]
    hidden = torch.randn(P_s, d, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(V_s, d, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 6, 0, 3, 2, -100, 4])  # row 5 carries no CE, row 6 is in no group
    groups = torch.tensor([[0, 1, 0, 1], [1, 2, 1, 1], [3, 1, 2, 2], [4, 2, 4, 2]])
    whole_logits = hidden @ head.T
    whole = cross_vocab_divergence(whole_logits, targets, teacher, realised_t,
                                   {"t_first": groups[:, 0], "t_len": groups[:, 1], "s_first": groups[:, 2],
                                    "s_len": groups[:, 3]}, proj).loss.sum()
    ce = torch.nn.functional.cross_entropy(whole_logits, targets, ignore_index=-100, reduction="sum")
    g_ref = torch.autograd.grad(whole + 0.5 * ce, (hidden, head))
    for chunk_size in (1, 2, 3, 100):
        for checkpoint in (False, True):
            c, dv = chunked_cross_divergence(hidden, head, targets, teacher, realised_t, groups, proj,
                                             chunk_size=chunk_size, checkpoint=checkpoint)
            torch.testing.assert_close(dv, whole, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(c, ce, rtol=1e-12, atol=1e-12)
            got = torch.autograd.grad(dv + 0.5 * c, (hidden, head))
            for a, b in zip(got, g_ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_empty_and_refusals():
    V = 5
    teacher = SparseTeacher(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0))
    groups = {k: torch.zeros(0, dtype=torch.long) for k in ("t_first", "t_len", "s_first", "s_len")}
    out = cross_vocab_divergence(torch.zeros(0, V, requires_grad=True), torch.zeros(0, dtype=torch.long), teacher,
                                 torch.zeros(0), groups, VocabProjection.identity(V))
    assert out.loss.shape == (0,) and out.loss.sum().item() == 0.0
    sampled = SparseTeacher(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), torch.zeros(1),
                            counts=torch.ones(1, 2))
    one = align_spans([(0, 1)], [(0, 1)]).tensors()
    with pytest.raises(ValueError, match="sparse topk"):
        cross_vocab_divergence(torch.zeros(1, V), torch.zeros(1, dtype=torch.long), sampled, torch.zeros(1), one,
                               VocabProjection.identity(V))
