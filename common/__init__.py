"""What the feddem server and its sites share: models, data, vectors, training, evaluation, weighting."""
