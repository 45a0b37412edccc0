"""COCO -> Parquet shards -> Ray Data -> padded batches; and the synthetic demo dataset.

Modules (import from them directly; this package imports nothing so that a shard-writing
process does not pay for importing Ray):
    coco        read + validate COCO annotations, category mapping
    shards      Parquet shard schema, parallel writer, readers, _meta.json, val ground truth
    transforms  DETR's augmentations on torchvision.transforms.v2
    pipeline    Ray Data datasets, DataConfig, collate, DetectionBatches
    demo        the embedded default dataset (synthetic shapes)
    storage     local paths and pyarrow filesystem URIs
"""
