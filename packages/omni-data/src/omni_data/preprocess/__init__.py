"""Raw data -> WebDataset training shards + a Parquet index, as a Ray Data job (see job.py)."""
