"""One pipeline per paper, each reproducing its core result end to end from a small config."""
