"""What a site computes for Chameleon besides its vector: the domain embedding of its data under the base model.
Only this summary leaves the site. (DGA's site-side signal, the alignment of the vector with the server's target
direction, lives with the rest of DGA in `common.weighting.dga`.)"""

import numpy as np
import torch

from feddem.common.data import TokenBatch
from feddem.common.errors import FeddemError

EMBED_BLOCKS = 32  # blocks of the site's train split averaged into its domain embedding


@torch.no_grad()
def domain_embedding(model, blocks: "torch.Tensor | TokenBatch", pad_id: int, device: torch.device) -> np.ndarray:
    """Mean over the real tokens of the middle layer's hidden state, over up to EMBED_BLOCKS rows. Of a `TokenBatch`
    the real tokens are those its attention mask marks (an EOS that ends an example counts even where the tokenizer
    pads with EOS); of plain [n, seq_len] blocks, the tokens other than `pad_id`."""
    model.eval().to(device)
    batch = isinstance(blocks, TokenBatch)
    ids = (blocks.input_ids if batch else blocks)[:EMBED_BLOCKS]
    masks = blocks.attention_mask[:EMBED_BLOCKS] if batch else (ids != pad_id).long()
    total, count = None, 0
    for row, row_mask in zip(ids.split(8), masks.split(8)):
        row, row_mask = row.to(device), row_mask.to(device)
        mask = row_mask.unsqueeze(-1).bool()
        hidden = model(input_ids=row, attention_mask=row_mask if batch else None,
                       output_hidden_states=True).hidden_states
        middle = hidden[len(hidden) // 2].float() * mask
        part = middle.sum(dim=(0, 1))
        total = part if total is None else total + part
        count += int(mask.sum())
    if not count:
        raise FeddemError("domain embedding: the site's sample has no tokens")
    return (total / count).cpu().numpy().astype(np.float32)
