"""The on-disk records and their readers: shard set, feature cache, predictions, cohort files,
checkpoints, stage records (manifests). Each format is documented in docs/ before its writer."""
