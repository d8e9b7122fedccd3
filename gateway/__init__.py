"""devicegate's data plane: the mutual-TLS MQTT bridge."""
