"""The engine's KV cache: static per-layer buffers, a committed length per row.

Every engine step feeds each row a block of new positions (a prompt, one text token,
`<boi>` + a noisy image, a clean image + `<eoi>`, ...). The block's keys and values are
written at the row's slots `length[r] .. length[r] + n[r] - 1` and the step's queries
attend to them and to the committed prefix. After the step the engine commits `c[r] <= n[r]`
of them: a text token is kept, a noisy image that a later denoising step replaces is not
(its slots are simply overwritten next step). Rows advance independently, so one row can
be writing text while another denoises an image, and nothing is ever re-prefilled.

Row slot == RoPE position: a generated document restarts at position 0 in its row, as
documents do in training, and every stream of a guided sequence has its own row.

The mask of a step (`step_mask`) is the training rule (model/masks.py) restated for this
layout: a query sees the committed prefix, the block's positions up to itself, and every
position of its own image block; a padding query (beyond n[r]) sees only itself.
"""

from __future__ import annotations

import torch

from mixmodal.model.masks import AttentionMask


class KVCache:
    """k/v buffers [R, Hkv, capacity, d] per layer, allocated on first use in the dtype the
    layer produces (bf16 under autocast). Implements the model's KVCache protocol."""

    def __init__(self, num_layers: int, rows: int, capacity: int, device: torch.device | str) -> None:
        self.num_layers, self.capacity = num_layers, capacity
        self.device = torch.device(device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self._slots: torch.Tensor | None = None  # [R, Tq] slots of the current step
        self._active = 0  # keys that can be attended this step: max over rows of length + Tq
        self._start: int | None = None  # the rows' common length this step, when they share one

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    def begin_step(self, block: int) -> torch.Tensor:
        """Prepare a step of `block` query positions per row; returns the RoPE positions [R, block]."""
        need = int(self.lengths.max()) + block if self.rows else block
        if need > self.capacity:
            raise RuntimeError(f"KV cache overflow: a step needs {need} slots, the cache holds {self.capacity}")
        self._slots = self.lengths[:, None] + torch.arange(block, device=self.device)[None]
        self._active = need
        lengths = self.lengths.tolist()
        self._start = lengths[0] if lengths and min(lengths) == max(lengths) else None
        return self._slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            shape = (self.rows, k.shape[1], self.capacity, k.shape[3])
            self.k[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        kb, vb = self.k[layer], self.v[layer]
        if self._start is not None:  # every row writes the same slots: a slice copy, not a scatter
            kb[:, :, self._start:self._start + k.shape[2]] = k
            vb[:, :, self._start:self._start + v.shape[2]] = v
        else:
            index = self._slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            kb.scatter_(2, index, k.to(kb.dtype))
            vb.scatter_(2, index, v.to(vb.dtype))
        return kb[:, :, :self._active], vb[:, :, :self._active]

    def commit(self, counts: torch.Tensor) -> None:
        """Keep the first counts[r] positions of this step's block in each row."""
        self.lengths += counts.to(self.lengths)

    def add_rows(self, n: int) -> None:
        """Append n empty rows (a sequence joining a running batch)."""
        self.lengths = torch.cat([self.lengths, torch.zeros(n, dtype=torch.long, device=self.device)])
        for layer in range(self.num_layers):
            if self.k[layer] is not None:
                pad = self.k[layer].new_zeros((n, *self.k[layer].shape[1:]))
                self.k[layer] = torch.cat([self.k[layer], pad])
                self.v[layer] = torch.cat([self.v[layer], pad.clone()])

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not in `rows` (finished sequences), in that order."""
        rows = rows.to(self.device)
        self.lengths = self.lengths[rows]
        for layer in range(self.num_layers):
            if self.k[layer] is not None:
                self.k[layer] = self.k[layer][rows]
                self.v[layer] = self.v[layer][rows]

    def step_mask(self, new: torch.Tensor, image_ids: torch.Tensor) -> AttentionMask:
        """new [R]: real positions in each row's block; image_ids [R, Tq]: image block of each
        block position (-1 none). Keys are the slots 0 .. active-1."""
        rows, block = image_ids.shape
        if block == 1 and self._start is not None and bool((new == 1).all()):
            return AttentionMask("full")  # one new position per row, all rows alike: it sees every key
        slots = self._slots  # [R, Tq]
        keys = torch.arange(self._active, device=self.device)[None, None, :]  # [1, 1, K]
        q = slots[:, :, None]
        start = self.lengths[:, None, None]
        in_block_key = (keys >= start) & (keys < start + new[:, None, None])
        key_image = torch.full((rows, self._active), -1, dtype=torch.long, device=self.device)
        key_image.scatter_(1, slots.clamp(max=self._active - 1), image_ids)
        same_image = (image_ids[:, :, None] >= 0) & (image_ids[:, :, None] == key_image[:, None, :]) & in_block_key
        allowed = (keys < start) | ((keys <= q) & in_block_key) | same_image
        real = torch.arange(block, device=self.device)[None, :] < new[:, None]  # [R, Tq]
        allowed = torch.where(real[:, :, None], allowed, keys == q)
        return AttentionMask("dense", dense=allowed[:, None])


__all__ = ["KVCache"]
