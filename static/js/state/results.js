// Message search results as plain data, and every change to them as a pure function.

/** No results yet for a query ("" when the search box is empty). */
export function emptyResults(q = "") {
  return { q: (q || "").trim(), hits: [], nextCursor: null, hasMore: false, loaded: false, unavailable: false };
}

function key(hit) {
  return hit.message.id;
}

/** A page of hits from the server, after those shown (each message once). */
export function addResults(state, page) {
  const seen = new Set(state.hits.map(key));
  const hits = state.hits.concat((page.messages || []).filter((hit) => !seen.has(key(hit))));
  return { ...state, hits, nextCursor: page.next_cursor ?? null, hasMore: Boolean(page.has_more), loaded: true };
}

/** The store cannot search message text (Firestore): the section says so once. */
export function resultsUnavailable(state) {
  return { ...state, hits: [], hasMore: false, loaded: true, unavailable: true };
}

/** A conversation changed: its hits show its new summary (name, status), in place. */
export function updateConversation(state, conversation) {
  let changed = false;
  const hits = state.hits.map((hit) => {
    if (hit.conversation.id !== conversation.id) return hit;
    changed = true;
    return { ...hit, conversation };
  });
  return changed ? { ...state, hits } : state;
}
