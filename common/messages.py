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
START = "start"  # ArrayRecord (train request, rounds > 1): the merged model so far, as a vector on the base
TARGET = "target"  # ArrayRecord (train request, dga): the target direction, minus the target-task gradient
EMBEDDING = "embedding"  # ArrayRecord (train reply, chameleon): the site's domain embedding
EVAL = "eval"  # ConfigRecord (evaluate request): split = validation | test

# Secure aggregation (SecAgg+ over the Message API; see client/secure_upload.py and server/secure_aggregation.py)
SA_KEYS = "query.sa_keys"  # stage 1: round parameters + this site's id and weight -> the site's two public keys
SA_SHARE = "query.sa_share"  # stage 2: everyone's public keys -> encrypted Shamir shares for the peers
SA_MASKED = "query.sa_masked"  # stage 3: the shares routed to this site -> its masked, quantized w_i * d_i
SA_UNMASK = "query.sa_unmask"  # stage 4: survivors and dropped sites -> shares that remove the masks
LAYOUT = "layout"  # ConfigRecord (train reply): names of the vector's parameters, sorted
SA_PARAMS = "sa-params"  # ConfigRecord: SecAggParams.to_dict()
SA_ROUND = "sa-round"  # ConfigRecord: this site's client id, weight, the vector's parameter names
SA = "sa"  # ConfigRecord: the stage's payload (keys, shares, survivors...) both ways
MASKED = "masked"  # ArrayRecord: the masked ring vector in chunks named by their ring offset
