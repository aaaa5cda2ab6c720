"""The Ray backend: instances spread over shard actors on a Ray cluster, behind the same Backend interface."""
