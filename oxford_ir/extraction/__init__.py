"""The one test-time path: image (+ box) -> tensor -> embeddings of any ``nn.Module``.

Evaluation, validation during training, the index, search and the web page embed images through this
package: batches planned from the image headers (:mod:`~oxford_ir.extraction.planning`), padded to a bounded
set of input shapes (:mod:`~oxford_ir.extraction.buckets`), decoded by DataLoader workers or on the GPU,
embedded at one or several scales with the chosen precision (:mod:`~oxford_ir.extraction.embedding`), and
sharded across processes (:mod:`~oxford_ir.extraction.distributed`).
"""
