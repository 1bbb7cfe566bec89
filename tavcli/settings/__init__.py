"""Settings: the option declarations, typed requests, user inputs and configuration. Free of torch."""
