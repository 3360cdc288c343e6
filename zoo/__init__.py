"""The zoo, in the order of the flow: recovery training (`train`), evaluation (`evaluate`), releases
from recipes to the Hub (`release`), and the `mla-zoo` command line (`cli`)."""
