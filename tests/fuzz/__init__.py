"""Coverage-guided fuzzers (atheris) for every parser of peer input and stored values.

Each ``fuzz_*`` module holds one target, ``test_one_input(data: bytes) -> None``,
and ``seeds() -> list[bytes]``, the inputs its corpus starts from. Run them with
``python -m tests.fuzz.run TARGET`` (see :mod:`tests.fuzz.run`).
"""
