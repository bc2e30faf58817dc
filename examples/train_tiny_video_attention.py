"""Train a one-layer video attention model with VSA in PyTorch, on CPU.

A student layer (projections around :class:`vsa_nd.adapters.torch.VideoSparseAttention`, with
a learned gate and positional embedding) learns to reproduce a fixed teacher: the same
architecture with dense softmax attention and random weights, on random videos of
4 x 8 x 8 latent tokens.  VSA cuts the video into 2 x 4 x 4 tiles (8 tiles) and keeps the
4 best key tiles per query tile (sparsity 0.5), so the student has to learn which tiles
matter.  Prints the loss curve and exits non-zero if the loss did not fall.

    python examples/train_tiny_video_attention.py [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch

import vsa_nd.adapters.torch as vsa

SEQ_SHAPE, TILE_SHAPE = (4, 8, 8), (2, 4, 4)
CHANNELS, HEADS = 32, 2  # head dim 16


class VideoAttention(torch.nn.Module):
    """x [B, S, C] -> [B, S, C]: one attention layer, VSA (sparse) or dense softmax."""

    def __init__(self, seq_len: int, sparse: bool):
        super().__init__()
        self.sparse, self.dim = sparse, CHANNELS // HEADS
        self.position = torch.nn.Parameter(0.5 * torch.randn(seq_len, CHANNELS))
        self.qkv = torch.nn.Linear(CHANNELS, 3 * CHANNELS)
        self.gate = torch.nn.Linear(CHANNELS, CHANNELS)
        self.out = torch.nn.Linear(CHANNELS, CHANNELS)
        self.attn = vsa.VideoSparseAttention(HEADS, self.dim)

    def forward(self, x: torch.Tensor, meta: vsa.VSAMetadata) -> torch.Tensor:
        b, s, c = x.shape
        h = x + self.position
        q, k, v = (t.contiguous() for t in self.qkv(h).view(b, s, 3, HEADS, self.dim).unbind(2))  # [B, S, H, D]
        if self.sparse:
            gate = torch.sigmoid(self.gate(h)).view(b, s, HEADS, self.dim)
            y = self.attn(q, k, v, gate, meta)
        else:
            y = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        return self.out(y.reshape(b, s, c))


def positive(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive, default=300)
    parser.add_argument("--batch", type=positive, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    meta = vsa.build_metadata(SEQ_SHAPE, (1, 1, 1), sparsity=0.5, tile_shape=TILE_SHAPE)
    seq_len = meta.plan.seq_len
    teacher, student = VideoAttention(seq_len, sparse=False), VideoAttention(seq_len, sparse=True)
    teacher.requires_grad_(False)
    with torch.no_grad():  # unit-variance targets, so the loss reads as a fraction of the signal
        spread = teacher(torch.randn(16, seq_len, CHANNELS), meta).std()
        teacher.out.weight /= spread
        teacher.out.bias /= spread
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    print(f"video {SEQ_SHAPE} in tiles {TILE_SHAPE}: {meta.plan.num_blocks} tiles, top-{meta.topk} per query tile; "
          f"{HEADS} heads of dim {CHANNELS // HEADS}; {args.steps} steps of batch {args.batch}")

    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        x = torch.randn(args.batch, seq_len, CHANNELS)
        loss = torch.nn.functional.mse_loss(student(x, meta), teacher(x, meta))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    window = max(1, min(20, len(losses) // 5))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"mean loss of the first {window} steps {first:.4f}, of the last {window} {last:.4f} "
          f"({last / first:.1%} of the start) in {time.perf_counter() - start:.1f} s")
    return 0 if last < 0.5 * first else 1


if __name__ == "__main__":
    raise SystemExit(main())
