"""Optional integrations with other libraries; each submodule guards its own optional import."""
