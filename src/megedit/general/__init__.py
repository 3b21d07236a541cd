"""General ability before and after editing (the paper's Table 3): BBH, GSM8K, MMLU, RTE and SST-2."""
