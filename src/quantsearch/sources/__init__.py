"""Sources: where models, data (with the model's preprocessing) and metrics come from."""
