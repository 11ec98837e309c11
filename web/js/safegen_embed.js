// SafeGen: "embed_in_workflow" on Load Implicit Negative Embedding.
// After the node runs with embed_in_workflow on, the server sends the packed vectors
// (safegen-ine:v1:...) in the node's executed message under "safegen_embedded"; this writes them
// into the node's "embedded" widget and selects "(embedded in workflow)", so the saved workflow
// carries the INE and runs where the file does not exist.
import { app } from "../../scripts/app.js";

const NODE = "SafeGen_LoadImplicitNegativeEmbedding";
const EMBEDDED = "(embedded in workflow)";

app.registerExtension({
  name: "SafeGen.EmbedImplicitNegativeEmbedding",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const packed = message?.safegen_embedded?.[0];
      if (typeof packed === "string" && packed.startsWith("safegen-ine:v1:")) {
        const get = (n) => this.widgets?.find((w) => w.name === n);
        const text = get("embedded");
        const choice = get("embedding_name");
        const flag = get("embed_in_workflow");
        if (text) text.value = packed;
        if (choice) choice.value = EMBEDDED;
        if (flag) flag.value = false;
        this.setDirtyCanvas?.(true, true);
      }
      return r;
    };
  },
});
