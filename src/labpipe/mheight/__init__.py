"""m-heights of real linear codes."""

from labpipe.mheight.exact import (
    m_height,
    m_heights,
    m_heights_batch,
    minimum_distance,
    systematic_generator,
)

__all__ = ["m_height", "m_heights", "m_heights_batch", "minimum_distance", "systematic_generator"]
