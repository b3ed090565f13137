"""Training-stage throughput: bf16 matmul rate, the graph-attention layer, full steps, the loader.

Run from the repository root:

    .venv/bin/python benchmarks/train_step.py [--quick]

1. The bf16 matmul rate of this machine: (19072 x 1024) @ (1024 x 1024), the shape of
   the layer's projections at batch 128 x 149 nodes.
2. One graph-attention layer at batch 128 x 149 nodes x 1024 (49 grid + 100 region
   nodes, regions padded after 60), forward + backward under bf16 autocast, in training
   mode (dropout 0.2) and with dropout off, as achieved GFLOP/s. FLOPs count the matrix
   products only: 12 D^2 per node for the projections and 4 N D per node for attention,
   times 3 for forward + backward.
3. Training steps at the Flickr30K shapes (K = 2, x = 1, D = 1024, 100 regions, a
   BERT-base architecture with random weights, captions of 14 tokens), batch 32,
   in fp32 and under bf16 autocast, as samples/s.
4. The chunked loader alone (grid + regions + tokens) on a zstd store in the page
   cache, with 2 DataLoader workers, as samples/s.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "train"))

from dsran.train.config import DataConfig, ModelConfig  # noqa: E402
from dsran.train.data import TrainingBatches, caption_samples, split_image_rows  # noqa: E402
from dsran.train.loss import triplet_loss  # noqa: E402
from dsran.train.model import DSRAN, GraphAttentionLayer  # noqa: E402
from dsran.train.text import load_tokenizer  # noqa: E402
from synthetic_store import MINILM, random_store  # noqa: E402


def timed(function, repeats: int) -> float:
    """Fastest of ``repeats`` calls after one warm-up call.

    The minimum, because other jobs on a shared machine only ever add time.
    """
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_rate(repeats: int) -> float:
    a = torch.randn(19072, 1024, dtype=torch.bfloat16)
    b = torch.randn(1024, 1024, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, repeats)
    return 2 * 19072 * 1024 * 1024 / seconds / 1e9


def layer_rate(repeats: int, training: bool) -> float:
    batch, nodes, dim = 128, 149, 1024
    torch.manual_seed(0)
    layer = GraphAttentionLayer(dim, heads=8, dropout=0.2).train(training)
    x = torch.randn(batch, nodes, dim, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(batch, nodes, dtype=torch.bool)
    mask[:, 49 + 60 :] = False

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x, mask)
        out.float().sum().backward()

    seconds = timed(step, repeats)
    flops = 3 * batch * nodes * (12 * dim * dim + 4 * nodes * dim)
    return flops / seconds / 1e9


def step_rate(repeats: int, precision: str) -> float:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = ModelConfig(embed_size=1024, ssr_layers=1, jsr_branches=2)
    model = DSRAN(config, BertModel(BertConfig())).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-5, eps=1e-6)
    batch_size = 32
    batch = {
        "grid/features": torch.randn(batch_size, 49, 2048),
        "regions/features": torch.randn(batch_size, 100, 2048),
        "regions/count": torch.randint(10, 101, (batch_size,)),
        "input_ids": torch.randint(1000, 30000, (batch_size, 14)),
        "attention_mask": torch.ones(batch_size, 14, dtype=torch.long),
    }

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            images, captions = model(batch)
        loss = triplet_loss(images, captions, torch.arange(batch_size))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return batch_size / timed(step, repeats)


def loader_rate(images: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        store = random_store(
            Path(folder) / "feats.zarr", n_images=images, captions_per_image=5, max_boxes=100
        )
        tokenizer = load_tokenizer(str(MINILM))
        samples = caption_samples(store, split_image_rows(store, ["train", "val"]), tokenizer, 32)
        config = DataConfig(batch_size=128, buffer_chunks=8, num_workers=2)
        steps = len(samples) // config.batch_size
        arrays = ("grid/features", "regions/features", "regions/count")

        def one_epoch(epoch):
            for _ in TrainingBatches(
                store.path, arrays, samples, config, store.chunk_images, 0, epoch, steps
            ):
                pass

        one_epoch(0)  # fills the page cache
        start = time.perf_counter()
        one_epoch(1)
        return steps * config.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and a smaller loader store"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 5

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    rate = matmul_rate(repeats)
    print(f"bf16 matmul (19072x1024 @ 1024x1024): {rate:.0f} GFLOP/s")
    for training in (True, False):
        layer = layer_rate(repeats, training)
        label = "training mode, dropout 0.2" if training else "dropout off"
        print(
            f"graph-attention layer 128x149x1024 fwd+bwd bf16 ({label}): {layer:.0f} GFLOP/s = {100 * layer / rate:.0f}% of matmul"
        )
    rate_after = matmul_rate(repeats)
    print(
        f"bf16 matmul again after the layer runs: {rate_after:.0f} GFLOP/s (the layer's share of the higher rate is the fair figure)"
    )
    fp32 = step_rate(max(2, repeats // 2), "fp32")
    bf16 = step_rate(max(2, repeats // 2), "bf16")
    print(
        f"training step, Flickr30K shapes, batch 32: fp32 {fp32:.1f} samples/s, bf16 {bf16:.1f} samples/s ({bf16 / fp32:.2f}x)"
    )
    print(
        f"chunked loader, grid + 100 regions + tokens, 2 workers: {loader_rate(128 if args.quick else 384):.0f} samples/s"
    )


if __name__ == "__main__":
    main()
