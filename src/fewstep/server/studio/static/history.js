// This browser's results with their settings, in IndexedDB (never on the server). Falls back to
// memory for the tab when IndexedDB is not available.

const DB_NAME = "fewstep-studio";
const STORE = "history";
export const HISTORY_LIMIT = 60;

function promised(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

export class History {
  constructor() {
    this.db = null;
    this.memory = [];
    this.nextId = 1;
  }

  async open() {
    try {
      const request = indexedDB.open(DB_NAME, 1);
      request.onupgradeneeded = () => {
        request.result.createObjectStore(STORE, { keyPath: "id", autoIncrement: true });
      };
      this.db = await promised(request);
    } catch {
      this.db = null;
    }
  }

  store(mode) {
    return this.db.transaction(STORE, mode).objectStore(STORE);
  }

  async add(entry) {
    if (!this.db) {
      const saved = { ...entry, id: this.nextId++ };
      this.memory.push(saved);
      this.memory = this.memory.slice(-HISTORY_LIMIT);
      return saved;
    }
    const id = await promised(this.store("readwrite").add(entry));
    const keys = await promised(this.store("readonly").getAllKeys());
    for (const old of keys.slice(0, Math.max(0, keys.length - HISTORY_LIMIT))) {
      await promised(this.store("readwrite").delete(old));
    }
    return { ...entry, id };
  }

  // Newest first.
  async list() {
    if (!this.db) return [...this.memory].reverse();
    const all = await promised(this.store("readonly").getAll());
    return all.reverse();
  }

  async get(id) {
    if (!this.db) return this.memory.find((e) => e.id === id) || null;
    return (await promised(this.store("readonly").get(id))) || null;
  }

  async remove(id) {
    if (!this.db) {
      this.memory = this.memory.filter((e) => e.id !== id);
      return;
    }
    await promised(this.store("readwrite").delete(id));
  }

  async clear() {
    if (!this.db) {
      this.memory = [];
      return;
    }
    await promised(this.store("readwrite").clear());
  }
}
