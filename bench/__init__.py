"""Benchmark harness for shardudp (issue 7): see bench/README.md."""
