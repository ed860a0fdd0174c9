"""The input pipeline: test-time and training datasets, transforms, augmentation (per image and batched), the
P x K sampler, the image cache, GPU decoding, prefetching and the DataModule. Benchmarks and their ground truth
live one layer below, in :mod:`oxford_ir.benchmarks`."""
