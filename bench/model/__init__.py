"""The model wing: the Policy the engine calls (policy), loading real / embedded / random models (models, families, random_models), named weight snapshots (snapshots) and FSDP sharding (fsdp)."""
