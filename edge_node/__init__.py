"""The edgepipe edge worker: owns the data, the labels, the loss and the edge layers."""
