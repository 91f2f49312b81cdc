"""Generated protobuf and gRPC code for the edgepipe wire (edgepipe.v1)."""
