"""What functionally invariant paths are for: continual learning, and more to come."""

from . import continual as continual
