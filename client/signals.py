"""What a site computes for Chameleon besides its vector: the domain embedding of its data under the base model.
Only this summary leaves the site. (DGA's site-side signal, the alignment of the vector with the server's target
direction, lives with the rest of DGA in `common.weighting.dga`.)"""

import numpy as np
import torch

from feddem.common.errors import FeddemError

EMBED_BLOCKS = 32  # blocks of the site's train split averaged into its domain embedding


@torch.no_grad()
def domain_embedding(model, blocks: torch.Tensor, pad_id: int, device: torch.device) -> np.ndarray:
    """Mean over the non-pad tokens of the middle layer's hidden state, over up to EMBED_BLOCKS blocks."""
    model.eval().to(device)
    blocks = blocks[:EMBED_BLOCKS]
    total, count = None, 0
    for row in blocks.split(8):
        row = row.to(device)
        mask = (row != pad_id).unsqueeze(-1)
        hidden = model(input_ids=row, output_hidden_states=True).hidden_states
        middle = hidden[len(hidden) // 2].float() * mask
        part = middle.sum(dim=(0, 1))
        total = part if total is None else total + part
        count += int(mask.sum())
    if not count:
        raise FeddemError("domain embedding: the site's sample has no tokens")
    return (total / count).cpu().numpy().astype(np.float32)
