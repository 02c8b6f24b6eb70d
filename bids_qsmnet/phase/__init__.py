"""Phase preprocessing: scaling, unwrapping, echo combination, background-field removal, masks."""
