"""The feddem site: a Flower ClientApp that fine-tunes on private data and uploads only its weighted vector."""
