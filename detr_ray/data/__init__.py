"""COCO -> Parquet shards -> Ray Data -> padded batches; and the synthetic demo dataset.

Modules (import from them directly; this package imports nothing so that a shard-writing
process does not pay for importing Ray):
    coco        read + validate COCO annotations, category mapping
    shards      Parquet shard schema, parallel writer, readers, _meta.json, val ground truth
    transforms  DETR's augmentations on torchvision.transforms.v2
    decode      a decode task: shard rows -> decoded, augmented rows (DECODED_SCHEMA)
    datasets    Ray Data datasets for train/val (read_parquet fused with the decode)
    collate     decoded rows -> a padded batch (images, mask, targets)
    batches     DetectionBatches: a Train worker's shard as batches (local shuffle, shape groups)
    demo        the embedded default dataset (synthetic shapes)
    storage     local paths and pyarrow filesystem URIs
"""
