"""The feddem server's admin API (feddem.admin.v1 over gRPC): services over the run store (`service`), token
authentication (`auth`), serving (`serve`, `feddem server`), the client side (`client`, used by `feddem-admin`),
recording a run (`recorder`, used by the ServerApp) and what the server computes (`models`)."""
