"""What every layer uses: settings, metrics, logs, errors. Imports no Agora package."""
