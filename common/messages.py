"""Names of the messages and records that the feddem ServerApp and ClientApp exchange (one place for both)."""

TRAIN = "train"  # fine-tune locally, keep the vector, report metadata
UPLOAD = "train.upload"  # send weight * vector
EVALUATE = "evaluate"  # evaluate base + aggregate on the held-out split

CONFIG = "config"  # ConfigRecord: the RunConfig as a flat dict
BASE = "base"  # ConfigRecord: model-ref, model-checksum
SITE = "site"  # ConfigRecord: site id, domain (reply)
METRICS = "metrics"  # MetricRecord (reply)
WEIGHT = "weight"  # ConfigRecord: weight (upload request)
VECTOR = "vector"  # ArrayRecord: the weighted vector (upload reply)
AGGREGATE = "aggregate"  # ArrayRecord: sum_i w_i d_i (evaluate request)
FAILURE = "failure"  # ConfigRecord: reason, when a site refuses or fails cleanly
