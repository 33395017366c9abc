"""Teacher-made training data, the phi-1 way: textbook expositions and exercises with tests,
asked of a teacher endpoint, filtered (parse, tests in the sandbox, near-duplicates,
HumanEval overlap) and written as Parquet shards with a manifest (`stage: generate`)."""
