"""Pack text into fixed-length, BOS-anchored token windows for the frozen model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class Window:
    """One fixed-length context; ``keep_mask`` is False where the token's activation must not be published."""

    input_ids: torch.Tensor  # LongTensor [T]
    keep_mask: torch.Tensor  # BoolTensor [T]
    carried: int = 0  # positions after the leading BOS that repeat the previous window's last tokens (context only)
    # provenance: the position's document (its ordinal in the docs iterable, -1 for BOS / padding / carried context)
    # and token index in it; every document up to ``complete_through`` has all its tokens in this window or earlier
    doc_ord: torch.Tensor | None = None  # LongTensor [T]
    doc_pos: torch.Tensor | None = None  # LongTensor [T]
    complete_through: int = -1


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _tokenized(tokenizer, docs: Iterable[str], chunk: int = 64) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens), tokenised in chunks so the fast tokenizer batches."""
    pending: list[str] = []
    for doc in docs:
        if not isinstance(doc, str):  # pretokenized: a list of token ids, in order with the texts around it
            if pending:
                yield from tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]
                pending = []
            yield list(doc)
            continue
        pending.append(doc)
        if len(pending) == chunk:
            yield from tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]
            pending = []
    if pending:
        yield from tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]


def pack_documents(tokenizer, docs: Iterable[str], context_length: int, skip_positions: int = 0) -> Iterator[Window]:
    """Concatenate documents into windows of ``context_length`` tokens.

    With a BOS token, every window starts with BOS and documents inside a window are separated by BOS, so each
    position sees a BOS-anchored context (as in SAELens); BOS and padding are masked out of the published tokens.
    The last partial window is padded. Deterministic: the same documents give the same windows.

    ``skip_positions`` (the producer's token policy): the first positions after a window's leading BOS (position 0
    without a BOS) are never published. A window that continues the stream starts with the previous window's last
    ``skip_positions`` tokens there, as context only, so every token is still published once, at a later position;
    the first window starts a document, where the first positions are ordinary. The cost is ``skip_positions`` of
    ``context_length`` positions of forward work, no token.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    bos = tokenizer.bos_token_id
    head = [] if bos is None else [bos]
    if not 0 <= skip_positions < context_length - len(head):
        raise ValueError(f"skip_positions must be in [0, {context_length - len(head)}) for context_length "
                         f"{context_length}, got {skip_positions}")
    ids: list[int] = list(head)
    keep: list[bool] = [False] * len(head)
    carried = 0
    ords: list[int] = [-1] * len(head)
    poss: list[int] = [-1] * len(head)

    def emit(complete_through: int) -> Window:
        pad = context_length - len(ids)
        return Window(
            input_ids=torch.tensor(ids + [_pad_id(tokenizer)] * pad, dtype=torch.long),
            keep_mask=torch.tensor(keep + [False] * pad, dtype=torch.bool),
            carried=carried,
            doc_ord=torch.tensor(ords + [-1] * pad, dtype=torch.long),
            doc_pos=torch.tensor(poss + [-1] * pad, dtype=torch.long),
            complete_through=complete_through,
        )

    ordinal = -1
    for ordinal, doc_ids in enumerate(_tokenized(tokenizer, docs)):
        if not doc_ids:
            continue
        if bos is not None and len(ids) > len(head):  # separate from the previous document in this window
            ids.append(bos)
            keep.append(False)
            ords.append(-1)
            poss.append(-1)
        i = 0
        while True:
            if len(ids) == context_length:
                yield emit(ordinal if i == len(doc_ids) else ordinal - 1)
                tail = ids[context_length - skip_positions :] if skip_positions else []
                ids, keep, carried = list(head) + tail, [False] * (len(head) + len(tail)), len(tail)
                ords, poss = [-1] * len(keep), [-1] * len(keep)  # carried tokens: context, published before
            if i == len(doc_ids):
                break
            take = min(context_length - len(ids), len(doc_ids) - i)
            ids.extend(doc_ids[i : i + take])
            keep.extend([True] * take)
            ords.extend([ordinal] * take)
            poss.extend(range(i, i + take))
            i += take
    if any(keep):
        yield emit(ordinal)


def count_tokens(tokenizer, docs: Iterable[str]) -> int:
    """Tokens ``pack_documents`` would publish, counted one document at a time (an independent check)."""
    return sum(len(tokenizer(doc, add_special_tokens=False, verbose=False).input_ids) for doc in docs)
