"""Small single-purpose Lightning callbacks; configs reference them by module path."""
