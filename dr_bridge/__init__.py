"""dr-bridge: OpenADR 2.0b demand-response events in, eDRV session power limits out."""
import warnings

# signxml (openleadr's XML signing) names DSA key types in its signatures, and newer cryptography releases
# deprecate DSA: importing it would print two CryptographyDeprecationWarnings on every command's stderr,
# noise no operator can act on (dr-bridge signs with RSA). Filtered here, before anything imports openleadr.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"signxml(\.|$)")

__version__ = "0.1.0"
