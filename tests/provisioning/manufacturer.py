"""The test manufacturer is the demo's (`provisioning.demo.manufacturer`)."""

from provisioning.demo.manufacturer import Idevid as Idevid
from provisioning.demo.manufacturer import Manufacturer as Manufacturer
