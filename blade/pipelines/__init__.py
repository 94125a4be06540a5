"""blade.pipelines."""
