"""qlm-opt: SLO-oriented queue manager and global scheduler for LLM serving."""
__version__ = "0.1.0"
