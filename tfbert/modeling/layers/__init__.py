"""Building blocks of the encoder. Each fused op swaps in behind one of these layers."""
