import os
import sys

import pytest
import torch

# Triton reads TRITON_INTERPRET when first imported (transformers imports it early): without a GPU, its kernels run in
# the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

from sparse_prefill.config import PATTERN_DEFAULTS, HeadSpec  # noqa: E402
from sparse_prefill.patches import ADAPTERS  # noqa: E402

# CI replays the same random examples every run (a red CI then means a regression, not a newly drawn case); local
# runs keep exploring new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# (dtype, atol, rtol) for sparse outputs against the fp32 reference.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


KINDS = tuple(ADAPTERS)  # the model types with an adapter


def tiny_model(kind: str = "llama", **overrides):
    """A random-init 2-layer model of type ``kind`` (:data:`KINDS`) with 4 query / 2 KV heads of 16 dims, full
    causal attention unless ``overrides`` say otherwise: nothing is downloaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    shape = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
    )
    if kind == "mistral":
        shape["sliding_window"] = None  # MistralConfig's default is 4096 (every layer a sliding-window layer)
    if kind == "phi3":
        shape.update(pad_token_id=None, bos_token_id=1, eos_token_id=2)  # Phi3Config's are past this vocabulary
    if kind == "glm":
        shape["pad_token_id"] = None  # GlmConfig's is past this vocabulary
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**shape, **overrides})).eval()


def spec(pattern: str, **params) -> HeadSpec:
    return HeadSpec(pattern, {**PATTERN_DEFAULTS[pattern], **params})


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU), loaded once per test session."""
    from sparse_prefill.tools.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def passkey(smollm2):
    """A ~700-token passkey prompt for SmolLM2: (input ids [1, S], passkey)."""
    from sparse_prefill.tools.prompts import passkey_prompt

    model, tok = smollm2
    text, key = passkey_prompt(tok, 700, depth=0.4, seed=3)
    return tok(text, return_tensors="pt").input_ids, key


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """allclose with a report of how many elements differ and where the worst one is."""
    actual, expected = actual.float(), expected.float()
    assert actual.isfinite().all(), "non-finite values in the output"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any():
        diff = (actual - expected).abs()
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} elements differ; max |diff| {diff.max():.3g} at {worst} "
            f"(actual {actual[worst]:.5g}, expected {expected[worst]:.5g})"
        )


def pytest_terminal_summary(terminalreporter):
    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and fuzz.CASES["n"]:
        terminalreporter.write_line(f"hypothesis: {fuzz.CASES['n']} random layers matched the reference")
    if fuzz is not None and fuzz.CASES["adaptive"]:
        terminalreporter.write_line(
            f"hypothesis: {fuzz.CASES['adaptive']} random adaptive layers chose as the loop reference does"
        )
