"""The SQL catalog: patients, studies, series, instances and their archival state."""
