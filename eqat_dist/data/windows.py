"""Token windows: non-overlapping ones for perplexity, random ones for calibration."""
from __future__ import annotations

import warnings

import torch

from .text import DataError, load_texts


_STREAMS: dict = {}


def _token_stream(tokenizer, documents) -> torch.Tensor:
    """Documents joined with blank lines, tokenized once per (tokenizer, documents) in a process."""
    key = (tokenizer.name_or_path, len(tokenizer), hash(tuple(documents)))
    if key not in _STREAMS:
        _STREAMS[key] = tokenizer("\n\n".join(documents), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return _STREAMS[key]


def _bos_per_window(tokenizer) -> int | None:
    """Models whose tokenizer adds a BOS (Gemma, Llama-2) need it at the start of every window."""
    probe = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    return bos if bos is not None and probe and probe[0] == bos else None


def eval_windows(tokenizer, source: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """The paper's perplexity protocol: documents joined with blank lines, cut into non-overlapping
    windows of `seqlen` tokens (a BOS opens each window where the tokenizer uses one)."""
    ids = _token_stream(tokenizer, load_texts(source))
    bos = _bos_per_window(tokenizer)
    body = seqlen - (bos is not None)
    n = ids.numel() // body
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"'{source}' has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    windows = ids[: n * body].reshape(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


def calibration_windows(tokenizer, source: str, seqlen: int, train_size: int, val_size: int,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random `seqlen`-token windows for training and validation, drawn from disjoint documents
    (90% / 10% of the shuffled documents, as the official code splits its calibration set)."""
    docs = list(load_texts(source))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=gen).tolist()
    cut = max(1, int(len(docs) * 0.9)) if val_size else len(docs)
    parts = ([docs[i] for i in order[:cut]], [docs[i] for i in order[cut:]])
    bos = _bos_per_window(tokenizer)
    body = seqlen - (bos is not None)
    out = []
    for part, count, name in zip(parts, (train_size, val_size), ("training", "validation")):
        if count == 0:
            out.append(torch.zeros(0, seqlen, dtype=torch.long))
            continue
        ids = _token_stream(tokenizer, part)
        if ids.numel() < body + 1:
            raise DataError(f"'{source}' has too little {name} text ({ids.numel()} tokens) for `seqlen` {seqlen}.")
        if count * body > ids.numel():
            warnings.warn(f"'{source}' has {ids.numel():,} {name} tokens and {count} windows of {seqlen} tokens "
                          f"need {count * body / ids.numel():.1f}x as many, so the windows overlap and repeat text "
                          "(the paper draws 4096 x 2048 from RedPajama): pass --calib-dataset redpajama (hub) or a "
                          "larger .txt/.jsonl/.parquet corpus for the paper's setting", stacklevel=2)
        starts = torch.randint(0, ids.numel() - body, (count,), generator=gen)
        win = torch.stack([ids[s: s + body] for s in starts.tolist()])
        if bos is not None:
            win = torch.cat([torch.full((count, 1), bos, dtype=win.dtype), win], dim=1)
        out.append(win)
    return out[0], out[1]


class TextWindows:
    """Calibration windows as E2E-QP's training rows: every token is a label (the causal-LM loss)."""

    def __init__(self, windows: torch.Tensor):
        self.input_ids = windows

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, rows: torch.Tensor, device) -> dict:
        ids = self.input_ids[rows].to(device)
        return {"input_ids": ids, "labels": ids}

    def tokens(self, rows: torch.Tensor) -> int:
        return len(rows) * self.input_ids.shape[1]

    def fingerprint(self) -> dict:
        """What a resumed E2E-QP checks it trains on (e2e/checkpoints.resume_plan)."""
        return {"windows": list(self.input_ids.shape), "data_checksum": int(self.input_ids.sum().item())}
