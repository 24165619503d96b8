"""Build the tiny Hugging Face fixtures of `tests/test_hf.py` with `transformers`.

Needs the optional extra (`pip install torch==2.13.0` first, then
`pip install -e .[interop]`). For each fixture: a random model of a few layers and
small widths, saved with `save_pretrained` under `tests/fixtures/hf/<name>/`, and
`logits.npz` beside it holding `tokens` (int, shape (batch, seq), odd lengths) and
the reference's float32 `logits` on them, computed in float64 and rounded (so the
fixture holds the reference's exact function, not its float32 rounding).

    python scripts/make_hf_fixtures.py            # writes tests/fixtures/hf/*
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"
VOCAB = 61  # odd, so no size coincides with another

# name -> (model_type, config options); each option that changes the computation
# is set both ways across the fixtures of a type.
FIXTURES = {
    "mamba_tied": (
        "mamba",
        dict(
            hidden_size=16,
            num_hidden_layers=2,
            state_size=5,
            conv_kernel=4,
            expand=2,
            time_step_rank=3,
            use_conv_bias=True,
            tie_word_embeddings=True,
            layer_norm_epsilon=1e-5,
        ),
    ),
    "mamba_untied": (
        "mamba",
        dict(
            hidden_size=12,
            num_hidden_layers=2,
            state_size=4,
            conv_kernel=3,
            expand=3,
            time_step_rank="auto",
            use_conv_bias=False,
            tie_word_embeddings=False,
            layer_norm_epsilon=1e-3,
        ),
    ),
    "mamba2_groups": (
        "mamba2",
        dict(
            hidden_size=16,
            num_hidden_layers=2,
            state_size=6,
            conv_kernel=4,
            expand=2,
            num_heads=4,
            head_dim=8,
            n_groups=2,
            use_conv_bias=True,
            tie_word_embeddings=False,
            layer_norm_epsilon=1e-5,
            chunk_size=8,
        ),
    ),
    "mamba2_tied": (
        "mamba2",
        dict(
            hidden_size=12,
            num_hidden_layers=2,
            state_size=4,
            conv_kernel=3,
            expand=2,
            num_heads=3,
            head_dim=8,
            n_groups=1,
            use_conv_bias=False,
            tie_word_embeddings=True,
            layer_norm_epsilon=1e-3,
            chunk_size=5,
        ),
    ),
    "falcon_mamba": (
        "falcon_mamba",
        dict(
            hidden_size=16,
            num_hidden_layers=2,
            state_size=4,
            conv_kernel=4,
            expand=2,
            time_step_rank=3,
            use_conv_bias=True,
            tie_word_embeddings=True,
            layer_norm_epsilon=1e-5,
            mixer_rms_eps=1e-3,
        ),
    ),
    "xlstm_single": (
        "xlstm",
        dict(
            hidden_size=16,
            embedding_dim=16,
            num_hidden_layers=2,
            num_heads=2,
            qk_dim_factor=0.5,
            v_dim_factor=1.0,
            weight_mode="single",
            tie_word_embeddings=False,
            gate_soft_cap=15.0,
            output_logit_soft_cap=30.0,
            norm_eps=1e-6,
            eps=1e-6,
            ffn_proj_factor=2.667,
            ffn_round_up_to_multiple_of=8,
            chunk_size=8,
            autocast_kernel_dtype="float32",
        ),
    ),
    "xlstm_fused": (
        "xlstm",
        dict(
            hidden_size=16,
            embedding_dim=16,
            num_hidden_layers=2,
            num_heads=4,
            qk_dim_factor=1.0,
            v_dim_factor=0.5,
            weight_mode="fused",
            tie_word_embeddings=True,
            gate_soft_cap=2.0,
            output_logit_soft_cap=3.0,
            norm_eps=1e-3,
            eps=1e-6,
            ffn_proj_factor=1.5,
            ffn_round_up_to_multiple_of=5,
            chunk_size=4,
            autocast_kernel_dtype="float32",
        ),
    ),
    # Griffin's pattern; window 5 < 23 tokens; MQA; half the head rotated; the
    # embedding scale sqrt(24) is not exact in bfloat16; a soft cap that bites
    "recurrent_gemma": (
        "recurrent_gemma",
        dict(
            hidden_size=24,
            num_hidden_layers=3,
            block_types=["recurrent", "recurrent", "attention"],
            num_attention_heads=3,
            num_key_value_heads=1,
            lru_width=24,
            conv1d_width=4,
            attention_window_size=5,
            intermediate_size=40,
            attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            partial_rotary_factor=0.5,
            logits_soft_cap=3.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    # the other way: pattern repeated over 4 layers, lru_width != hidden_size, GQA-free
    # multi-head attention with q/k/v biases, a quarter rotated, untied head
    "recurrent_gemma_untied": (
        "recurrent_gemma",
        dict(
            hidden_size=16,
            num_hidden_layers=4,
            block_types=["recurrent", "attention"],
            num_attention_heads=2,
            num_key_value_heads=2,
            lru_width=12,
            conv1d_width=3,
            attention_window_size=3,
            intermediate_size=25,
            attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100.0},
            partial_rotary_factor=0.25,
            logits_soft_cap=30.0,
            rms_norm_eps=1e-3,
            tie_word_embeddings=False,
        ),
    ),
}

_CLASS_NAMES = {
    "mamba": ("MambaConfig", "MambaForCausalLM"),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM"),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM"),
    "xlstm": ("xLSTMConfig", "xLSTMForCausalLM"),
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM"),
}
# the model types this transformers has (xLSTM is recent)
CLASSES = {
    kind: (getattr(transformers, config), getattr(transformers, model))
    for kind, (config, model) in _CLASS_NAMES.items()
    if hasattr(transformers, model)
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Parameters of order one everywhere (the default init leaves logits near
    uniform, a weak test): weights ~ N(0, 1/fan_in), norms 1 + N(0, 0.2²), decays
    spread over a range, `D` ~ N(0, 1), step-size biases spread around softplus⁻¹(0.05);
    RecurrentGemma: norm weights N(0, 0.2²) (its scale is 1 + weight), RG-LRU decays
    `σ(Λ)^8` uniform in [0.5, 0.99], block-diagonal gates N(0, 1/block)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            if name.endswith("A_log"):
                new = torch.log(torch.rand(shape, generator=g) * 7.5 + 0.5)
            elif name.endswith("recurrent_param"):  # softplus(p) = -log(u) / 8
                u = 0.5 + 0.49 * torch.rand(shape, generator=g, dtype=torch.float64)
                new = torch.log(torch.expm1(-torch.log(u) / 8)).float()
            elif name.endswith("gate_weight"):  # (heads, block, block)
                new = torch.randn(shape, generator=g) / math.sqrt(shape[-2])
            elif name.endswith(("pre_norm.weight", "final_norm.weight")):
                new = 0.2 * torch.randn(shape, generator=g)
            elif name.endswith(".D"):
                new = torch.randn(shape, generator=g)
            elif "norm" in name:
                new = 1 + 0.2 * torch.randn(shape, generator=g)
            elif name.endswith("dt_proj.bias") or name.endswith("dt_bias"):
                new = -3 + torch.randn(shape, generator=g)
            elif name.endswith("bias"):
                new = 0.3 * torch.randn(shape, generator=g)
            elif "embeddings" in name:
                new = torch.randn(shape, generator=g)
            else:
                fan_in = math.prod(shape[1:])
                new = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            p.copy_(new.to(p.dtype))


def build(model_type: str, options: dict, seed: int):
    config_cls, model_cls = CLASSES[model_type]
    # transformers 5.24 cannot initialise a fused xLSTM (its _init_weights slices the
    # fused gate bias wrongly): build the single-matrix model, fuse it after saving
    options = {**options, "weight_mode": "single"} if model_type == "xlstm" else options
    config = config_cls(vocab_size=VOCAB, **options)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomise(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def fuse_xlstm(out: Path) -> None:
    """Rewrite a saved single-matrix xLSTM as `weight_mode: fused` (the same function:
    `qkv_opreact` is q, k, v, o stacked, `ifgate_preact` both gates, and
    `proj_up_gate_z` the MLP's gate and up maps)."""
    import json

    from safetensors.numpy import load_file, save_file

    t = load_file(out / "model.safetensors")
    n = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    for i in range(n):
        m, f = f"backbone.blocks.{i}.mlstm_layer.", f"backbone.blocks.{i}.ffn."
        qkvo = [t.pop(m + f"{p}.weight") for p in ("q", "k", "v", "ogate_preact")]
        t[m + "qkv_opreact.weight"] = np.concatenate(qkvo)
        for kind in ("weight", "bias"):
            gates = [t.pop(m + f"{g}_preact.{kind}") for g in ("igate", "fgate")]
            t[m + f"ifgate_preact.{kind}"] = np.concatenate(gates)
        up = [t.pop(f + p) for p in ("proj_up_gate.weight", "proj_up.weight")]
        t[f + "proj_up_gate_z.weight"] = np.concatenate(up)
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["weight_mode"] = "fused"
    (out / "config.json").write_text(json.dumps(config, indent=2))


def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    """The reference's logits in float64 (no cache: its parallel form)."""
    m64 = model.to(torch.float64)
    with torch.no_grad():
        out = m64(torch.as_tensor(tokens), use_cache=False).logits
    model.to(torch.float32)
    return out.numpy().astype(np.float32)


def tokens_for(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, size=(2, 23)).astype(np.int64)


# A character-level tokenizer.json beside one fixture, smaller than its vocabulary (so
# fine-tuning through `init_from: hf:PATH` cuts the embedding's rows to the task's).
TOKENIZER_FOR = "mamba_tied"
CHARS = "abcdefghijklmnopqrstuvwxyz .,:\n"


def write_tokenizer(out: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(out / "tokenizer.json"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    parser.add_argument("--only", nargs="*", help="fixture names (default: all)")
    args = parser.parse_args()
    for seed, (name, (model_type, options)) in enumerate(FIXTURES.items()):
        if args.only and name not in args.only:
            continue
        if model_type not in CLASSES:
            print(
                f"{name}: skipped (transformers {transformers.__version__} has no "
                f"{model_type})"
            )
            continue
        model = build(model_type, options, seed)
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, safe_serialization=True)
        tokens = tokens_for(100 + seed)
        np.savez(out / "logits.npz", tokens=tokens, logits=reference_logits(model, tokens))
        (out / "generation_config.json").unlink(missing_ok=True)
        if options.get("weight_mode") == "fused":
            fuse_xlstm(out)
        if name == TOKENIZER_FOR:
            write_tokenizer(out)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{name}: {model_type}, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
