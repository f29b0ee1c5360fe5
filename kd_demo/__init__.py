"""The built-in demo and the tiny models, above both halves (it imports ``kd_cache`` and ``student``)."""
