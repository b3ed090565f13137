"""Benchmark Recall@K by counting against a per-query argsort loop.

Seeded random 1024-d embeddings of 5,000 images and 25,000 captions (5 per image, the
size of the COCO 5K test protocol). The reference loop follows the evaluation scripts
that image-text matching papers publish: for every query, sort all candidate scores
and look up the position of the positive. The two must give identical ranks except
where a negative ties the positive's score exactly, which float32 scores do now and
then. There the reference's rank depends on the sort, and it must lie within the tie. The timed counting run is the one ``retrieval_metrics`` makes (no top-1 search);
a second run with the top-1 search of the reports is timed too.

    .venv/bin/python benchmarks/eval_recall.py [--images 5000] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc

import numpy as np
import torch
from dsran.evaluate.recall import metrics_from_ranks, retrieval_ranks
from tqdm import tqdm


def argsort_ranks(similarity: np.ndarray, caption_image: np.ndarray):
    """Rank every query by sorting its scores, one query at a time (the slow reference)."""
    num_images, num_captions = similarity.shape
    i2t = np.empty(num_images, dtype=np.int64)
    for image in tqdm(range(num_images), desc="reference i2t", mininterval=5):
        order = np.argsort(similarity[image])[::-1]
        positives = np.flatnonzero(caption_image == image)
        i2t[image] = min(np.flatnonzero(order == caption)[0] for caption in positives) + 1

    t2i = np.empty(num_captions, dtype=np.int64)
    by_caption = np.ascontiguousarray(similarity.T)
    for caption in tqdm(range(num_captions), desc="reference t2i", mininterval=5):
        order = np.argsort(by_caption[caption])[::-1]
        t2i[caption] = np.flatnonzero(order == caption_image[caption])[0] + 1
    return i2t, t2i


def tied_negatives(similarity: np.ndarray, caption_image: np.ndarray, ranks) -> tuple:
    """Count, per query, the negatives whose score equals the score that set its rank."""
    num_captions = similarity.shape[1]
    positive = similarity[caption_image, np.arange(num_captions)]
    t2i_ties = (similarity == positive[None, :]).sum(axis=0) - 1
    best = positive[ranks.i2t_best_caption]
    i2t_ties = (similarity == best[:, None]).sum(axis=1) - np.bincount(
        caption_image[positive == best[caption_image]], minlength=similarity.shape[0]
    )
    return i2t_ties, t2i_ties


def check_agreement(name: str, fast: np.ndarray, reference: np.ndarray, ties: np.ndarray) -> int:
    """Require equal ranks where nothing ties, and the reference within the tie elsewhere."""
    differ = fast != reference
    if (differ & (ties == 0)).any():
        raise SystemExit(
            f"{name}: ranks differ on untied queries {np.flatnonzero(differ & (ties == 0))[:10]}"
        )
    if ((reference < fast) | (reference > fast + ties)).any():
        raise SystemExit(f"{name}: a reference rank lies outside its tie")
    return int(differ.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="number of images")
    parser.add_argument("--per-image", type=int, default=5, help="captions per image")
    parser.add_argument("--dim", type=int, default=1024, help="embedding size")
    parser.add_argument("--device", default="cpu", help="torch device of the counting version")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the embeddings")
    args = parser.parse_args()

    # 1. Seeded random embeddings and their similarity matrix (not timed).
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.nn.functional.normalize(torch.randn(args.images, args.dim, generator=generator))
    num_captions = args.images * args.per_image
    captions = torch.nn.functional.normalize(
        torch.randn(num_captions, args.dim, generator=generator)
    )
    caption_image = np.repeat(np.arange(args.images), args.per_image)
    similarity = (images @ captions.T).numpy()
    del images, captions
    print(f"similarity {similarity.shape} float32, {similarity.nbytes / 2**20:.0f} MiB")

    # 2. Counting version: one warm-up on a slice, then the timed runs.
    warm_up = caption_image < 100
    retrieval_ranks(similarity[:100, warm_up], caption_image[warm_up], device=args.device)
    start = time.perf_counter()
    ranks = retrieval_ranks(similarity, caption_image, device=args.device, with_top1=False)
    fast_seconds = time.perf_counter() - start
    # numpy reports its allocations to tracemalloc, so this is the extra memory of the
    # numpy backend beyond the similarity matrix (torch allocations are not counted).
    tracemalloc.start()
    retrieval_ranks(similarity, caption_image, device=args.device, with_top1=False)
    extra_mib = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    fast = metrics_from_ranks(ranks.i2t, ranks.t2i)
    start = time.perf_counter()
    ranks = retrieval_ranks(similarity, caption_image, device=args.device)
    top1_seconds = time.perf_counter() - start

    # 3. Reference loop.
    start = time.perf_counter()
    i2t, t2i = argsort_ranks(similarity, caption_image)
    reference_seconds = time.perf_counter() - start
    reference = metrics_from_ranks(i2t, t2i)

    i2t_ties, t2i_ties = tied_negatives(similarity, caption_image, ranks)
    i2t_tied = check_agreement("i2t", ranks.i2t, i2t, i2t_ties)
    t2i_tied = check_agreement("t2i", ranks.t2i, t2i, t2i_ties)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(
        f"counting ({args.device}):      {fast_seconds:.2f} s, peak extra memory {extra_mib:.0f} MiB"
    )
    print(f"counting with top-1:  {top1_seconds:.2f} s")
    print(f"argsort loop:         {reference_seconds:.2f} s")
    print(f"speed-up:             {reference_seconds / fast_seconds:.1f}x")
    print(
        f"queries whose positive ties a negative: i2t {int((i2t_ties > 0).sum())}, t2i {int((t2i_ties > 0).sum())}"
    )
    print(f"ranks that differ (all within a tie): i2t {i2t_tied}, t2i {t2i_tied}")
    for key in fast:
        print(f"  {key:9s} counting {fast[key]:9.4f}  argsort {reference[key]:9.4f}")
    differing = [key for key in fast if fast[key] != reference[key]]
    print(f"metrics that differ:  {differing or 'none'}")


if __name__ == "__main__":
    main()
