"""Decoding options every engine must decode exactly as Hugging Face's ``generate`` does.

``check_decoding(model, hf, case)`` runs one case with ``model.generate`` on the engine
under test and with ``hf.generate`` on the same weights, and compares the tokens of
every row. Prompts of different lengths, so the batch is left-padded.
"""

from __future__ import annotations

from typing import Any

import torch

PROMPTS = ["The Eiffel Tower is located in the city of", "Hello there"]
NEW = 8

CASES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "sample": {"do_sample": True, "seed": 1},
    "sample-warped": {"do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9,
                      "seed": 7},
    "repetition-penalty": {"repetition_penalty": 1.8},
    "sample-repetition-penalty": {"do_sample": True, "temperature": 1.3, "repetition_penalty": 1.3,
                                  "seed": 3},
    "eos": {"eos_token_id": "third token of row 0"},
    "stop-string": {"stop": "text of a word of row 0"},
}


def _hf_generate(hf: Any, tokenizer: Any, pad_id: int, options: dict[str, Any]) -> torch.Tensor:
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kwargs = {k: v for k, v in options.items() if k not in ("seed", "stop", "do_sample")}
    if "stop" in options:
        kwargs.update(stop_strings=options["stop"], tokenizer=tokenizer)
    if options.get("seed") is not None:
        torch.manual_seed(options["seed"])
    device = next(hf.parameters()).device
    with torch.inference_mode():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                          max_new_tokens=NEW, pad_token_id=pad_id,
                          do_sample=options.get("do_sample", False), **kwargs).cpu()
    return [out[i, width - len(r):].tolist() for i, r in enumerate(rows)]


def _resolve(hf: Any, tokenizer: Any, pad_id: int, case: str) -> dict[str, Any]:
    """The case's options; ``eos`` and ``stop`` are picked from a greedy run, so that row 0
    stops early and row 1 does not."""
    options = dict(CASES[case])
    if case in ("eos", "stop-string"):
        greedy = _hf_generate(hf, tokenizer, pad_id, {})
        n0 = len(tokenizer(PROMPTS[0])["input_ids"])
        new0, new1 = greedy[0][n0:], greedy[1][len(tokenizer(PROMPTS[1])["input_ids"]):]
        if case == "eos":
            options["eos_token_id"] = [t for t in new0[2:-1] if t not in new0[:2] + new1][0]
        else:
            words = [(k, tokenizer.decode([t]).strip()) for k, t in enumerate(new0[:-1]) if k >= 2]
            k, word = next((k, w) for k, w in words
                           if len(w) >= 2 and w.isascii() and w.isalpha()
                           and w not in tokenizer.decode(new1) + tokenizer.decode(new0[:k]))
            options["stop"] = [word]
    return options


def check_decoding(model: Any, hf: Any, case: str) -> list[list[int]]:
    """Decode ``case`` on ``model`` (a deployed LabModel) and with ``hf.generate``; the
    tokens must be equal. Returns them."""
    tokenizer = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    options = _resolve(hf, tokenizer, pad_id, case)
    want = _hf_generate(hf, tokenizer, pad_id, options)
    with model.generate(PROMPTS, max_new_tokens=NEW, **options) as gen:
        pass
    got = [t.tolist() for t in gen.output_ids]
    assert got == want, f"{case}: {got} != {want}"
    if case in ("eos", "stop-string"):  # row 0 stopped early (then padded), row 1 ran on
        assert len(got[1]) - len(tokenizer(PROMPTS[1])["input_ids"]) == NEW
        assert got[0][-1] == pad_id
    return got
