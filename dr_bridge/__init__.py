"""dr-bridge: OpenADR 2.0b demand-response events in, eDRV session power limits out."""
__version__ = "0.1.0"
